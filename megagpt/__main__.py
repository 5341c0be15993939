from megagpt.cli import console_main

console_main()
