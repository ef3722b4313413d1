import os
import sys

# helpers shared by every test folder (devicehelp) live here
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
