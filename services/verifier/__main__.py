from services.serve import main

main("verifier")
