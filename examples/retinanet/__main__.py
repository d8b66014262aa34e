"""`python -m examples.retinanet`: the detector demo behind `make demo`."""

from examples.retinanet.demo import main

main()
