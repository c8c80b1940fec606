"""Ablation sweep over attention x position x sparse pattern x seeds; see `hf_attention.training.ablate`.

    python recipes/ablate.py --task image_classification \
        --base_config configs/recipes/image_classification_digits.yaml \
        --attention_types standard,sparse --position_types learned,alibi --seeds 0,1 --output_dir sweeps/digits
"""

from hf_attention.training.ablate import main

if __name__ == "__main__":
    raise SystemExit(main())
