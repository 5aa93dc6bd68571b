from meshllm.router.cli import main

main()
