"""Search hyper-parameters of DCCL (or of any RecBole model) the way RecBole's run_hyper.py does.

    python run_hyper_dccl.py --model=DCCL --dataset=ml-100k --params_file=dccl.hyper --output_file=dccl.result
"""

import sys

from recbole_dccl.hyper import main

if __name__ == "__main__":
    sys.exit(main())
