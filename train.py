"""Train a flow-matching target model: ``python train.py fit --config configs/digits.yaml``.

Resume with ``python train.py fit --config configs/digits.yaml --ckpt_path last``; see ``--help``.
"""
from specflow.cli import main

if __name__ == "__main__":
    main()
