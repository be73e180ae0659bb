from perceptscore.cli import main

main()
