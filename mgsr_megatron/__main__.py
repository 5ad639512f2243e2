"""`python -m mgsr_megatron ...` (and `torchrun -m mgsr_megatron ...`) == the `mgsr` console script."""

from mgsr_megatron.cli import main

if __name__ == "__main__":  # the checkpoint writer's spawned helpers re-import __main__
    main()
