"""Registers the ``"pycoll"`` torch.distributed backend when torch is imported.

pycoll declares :func:`autoload` as an entry point in torch's plugin group
``torch.backends``; torch calls it at the end of ``import torch`` (unless
``TORCH_DEVICE_BACKEND_AUTOLOAD=0``). It must never break torch's import, so
every error is swallowed, and pycoll's torch module is loaded only when a
``"pycoll"`` process group is actually created.
"""


def _create(store, rank, size, timeout):
    from pycoll.torch.backend import create_process_group
    return create_process_group(store, rank, size, timeout)


def autoload():
    """Entry point: register ``"pycoll"`` with torch.distributed (lazily)."""
    try:
        import torch.distributed as dist
        if dist.is_available() and "pycoll" not in dist.Backend.backend_list:
            dist.Backend.register_backend("pycoll", _create, devices=["cpu", "cuda"])
    except Exception:  # noqa: BLE001 - a plugin must not break `import torch`
        pass
