"""``python -m worq_core`` and the ``worq`` script: the command line."""


def main() -> None:
    """Run the ``worq`` command line.

    The ``worq`` script imports this module, not :mod:`worq_core.cli`, because multiprocessing
    runs the script again as ``__mp_main__`` in every process it spawns: a module this small
    keeps click and the CLI out of the lease keeper. (A keeper whose broker has no
    :meth:`~worq_core.Broker.recipe` still imports the CLI, to load the app from it.)
    """
    from worq_core.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
