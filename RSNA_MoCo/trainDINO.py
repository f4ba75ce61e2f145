"""DINO pretraining on RSNA brain CT. Run `python trainDINO.py --help` for the flags."""
import sys

from mirl.cli import pretrain_script

if __name__ == "__main__":
    sys.exit(pretrain_script("rsna", "dino", __file__))
