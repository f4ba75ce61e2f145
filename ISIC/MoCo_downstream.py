"""ISIC 2019 dermoscopy classification from the MoCo encoder (--frozen: linear probe; --resnet: supervised baseline). Run `python MoCo_downstream.py --help` for the flags."""
import sys

from mirl.cli import downstream_script

if __name__ == "__main__":
    sys.exit(downstream_script("isic", "moco", __file__))
