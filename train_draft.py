"""Train a draft for speculative sampling against a frozen target checkpoint:

    python train_draft.py fit --config configs/digits_medusa.yaml     # Medusa heads (drafter "medusa")
    python train_draft.py fit --config configs/digits_draft.yaml      # small distilled net (drafter "model")

``--model.target_ckpt PATH`` picks the target (default in the configs: runs/digits/checkpoints/last.ckpt).
Sample with: python sample.py TARGET.ckpt --draft runs/digits_medusa/checkpoints/last.ckpt --sampler speculative
"""
from specflow.cli import draft_main

if __name__ == "__main__":
    draft_main()
