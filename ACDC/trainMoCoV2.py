"""MoCo v2 pretraining on ACDC cardiac cine MRI. Run `python trainMoCoV2.py --help` for the flags."""
import sys

from mirl.cli import pretrain_script

if __name__ == "__main__":
    sys.exit(pretrain_script("acdc", "mocov2", __file__))
