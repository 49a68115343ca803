from vidu_cli.app import main

main()
