from services.drafter.servicer import DrafterService
from services.serve import main

main(DrafterService)
