from services.serve import main

main("drafter")
