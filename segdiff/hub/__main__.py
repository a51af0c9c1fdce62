from ..cli.hub import main

main()
