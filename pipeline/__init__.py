"""From Kaggle's files to per-image predictions, and the `glr` command line."""


def package_versions(*names: str) -> dict[str, str]:
    """Python's and the named installed packages' versions, for run manifests (absent ones left out)."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
