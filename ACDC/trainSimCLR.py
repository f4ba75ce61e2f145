"""SimCLR pretraining on ACDC cardiac cine MRI. Run `python trainSimCLR.py --help` for the flags."""
import sys

from mirl.cli import pretrain_script

if __name__ == "__main__":
    sys.exit(pretrain_script("acdc", "simclr", __file__))
