from dbops.cli.entry import main

main()
