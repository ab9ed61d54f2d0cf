"""specflow: fast, honest sampling of flow-matching models.

    from specflow.sampling import build_sampler       # plain PyTorch, any model(x, t, cond=None)
    target = specflow.load_target("target.ckpt")       # EMA velocity net from a Lightning checkpoint
"""
__version__ = "0.1.0"


def __getattr__(name):
    # Checkpoint loaders import Lightning; keep `import specflow.sampling` free of it.
    if name in ("load_target", "load_draft"):
        from specflow import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'specflow' has no attribute {name!r}")
