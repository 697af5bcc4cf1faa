from .bench_ops import main

main()
