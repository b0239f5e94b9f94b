"""`python -m onnxlrp` and the `onnxlrp` command: signal handlers first, then the (slow) imports of the CLI."""


def main() -> None:
    from .ir.interrupts import install
    install()
    from .app.cli import main as run
    run()


if __name__ == "__main__":
    main()
