from minitpo.cli import main

main()
