"""MoCo v1 pretraining on ISIC 2019 dermoscopy. Run `python trainMoCo.py --help` for the flags."""
import sys

from mirl.cli import pretrain_script

if __name__ == "__main__":
    sys.exit(pretrain_script("isic", "moco", __file__))
