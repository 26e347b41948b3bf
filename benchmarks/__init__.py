"""jitopt's benchmark suite against eager, Inductor and the other CPU engines.

    python -m benchmarks                    # every model, every backend installed
    python -m benchmarks --quick            # tiny sizes (what CI's harness test runs)
    python -m benchmarks --model mlp --model cnn --backend eager --backend jitopt
"""
