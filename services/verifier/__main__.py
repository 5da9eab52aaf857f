from services.serve import main
from services.verifier.servicer import VerifierService

main(VerifierService)
