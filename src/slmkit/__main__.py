"""`python -m slmkit ...`: the entry point torchrun needs (`torchrun --nproc_per_node 2 -m slmkit train ...`)."""

from slmkit.entry import main

if __name__ == "__main__":
    main()
