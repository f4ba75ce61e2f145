"""ISIC 2019 dermoscopy classification from the DINO encoder (--frozen: linear probe; --resnet: supervised baseline). Run `python DINO_downstream.py --help` for the flags."""
import sys

from mirl.cli import downstream_script

if __name__ == "__main__":
    sys.exit(downstream_script("isic", "dino", __file__))
