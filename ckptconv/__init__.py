"""ckptconv: Hugging Face <-> Megatron-Core checkpoint conversion for vision-language models."""


def __getattr__(name: str):
    # ``ckptconv.__version__`` is pyproject.toml's version as installed, looked up on first use:
    # importlib.metadata costs ~20 ms, and the entry point imports this package before anything
    # else (it installs the Ctrl-C handler first).
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("ckptconv")
        except PackageNotFoundError:  # a checkout that was never installed
            return "0.0.0+unknown"
    raise AttributeError(f"module 'ckptconv' has no attribute {name!r}")
