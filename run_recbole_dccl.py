"""Run DCCL (or any RecBole model, for baselines) the way RecBole's run_recbole.py runs models.

    python run_recbole_dccl.py --model=DCCL --dataset=ml-100k --backbone=SASRec
    python run_recbole_dccl.py --model=SASRec --dataset=ml-100k
"""

import sys

from recbole_dccl.quick_start import main

if __name__ == "__main__":
    sys.exit(main())
