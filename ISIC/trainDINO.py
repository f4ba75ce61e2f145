"""DINO pretraining on ISIC 2019 dermoscopy. Run `python trainDINO.py --help` for the flags."""
import sys

from mirl.cli import pretrain_script

if __name__ == "__main__":
    sys.exit(pretrain_script("isic", "dino", __file__))
