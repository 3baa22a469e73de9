"""pycoll bench --train refuses bad arguments with a message and exit status 2, before it starts
anything (no torch needed for that)."""
import pytest

from pycoll import cli


@pytest.mark.parametrize("args, words", [
    (["--ranks", "0"], "--ranks takes a comma list of integers of at least 1, not '0'"),
    (["--ranks", "2,x"], "--ranks takes a comma list of integers of at least 1, not '2,x'"),
    (["--ranks", ","], "--ranks takes a comma list of integers of at least 1, not ','"),
    (["--burn", "0,-1"], "--burn takes a comma list of integers of at least 0, not '0,-1'"),
    (["--shapes", "huge"], "unknown shape 'huge' (comm, compute)"),
    (["--steps", "0"], "--steps must be at least 1"),
])
def test_bad_arguments_exit_2_with_the_reason(args, words, capsys):
    assert cli.main(["bench", "--train"] + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("pycoll bench --train: ") and words in err, err


def test_help_after_train_is_the_training_steps(capsys):
    """Everything after --train is the training step's: its --help, not the all-reduce one's."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pycoll bench --train") and "--wrap {ddp,fsdp2}" in out
