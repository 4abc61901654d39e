from neuronserve.cli import main

main()
