from meshllm.replica.cli import main

main()
