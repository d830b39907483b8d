import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZOO = os.path.join(ROOT, "zoo")
sys.path.insert(0, os.path.join(ROOT, "tests"))
