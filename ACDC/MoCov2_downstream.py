"""ACDC cardiac cine MRI classification from the MoCo v2 encoder (--frozen: linear probe; --resnet: supervised baseline). Run `python MoCov2_downstream.py --help` for the flags."""
import sys

from mirl.cli import downstream_script

if __name__ == "__main__":
    sys.exit(downstream_script("acdc", "mocov2", __file__))
