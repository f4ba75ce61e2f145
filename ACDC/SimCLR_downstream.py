"""ACDC cardiac cine MRI classification from the SimCLR encoder (--frozen: linear probe; --resnet: supervised baseline). Run `python SimCLR_downstream.py --help` for the flags."""
import sys

from mirl.cli import downstream_script

if __name__ == "__main__":
    sys.exit(downstream_script("acdc", "simclr", __file__))
