# Sourced by .ci/run: installs and starts what the tests need on a bare machine.
# Fashion-MNIST (Debian's dataset-fashion-mnist) is optional for tests; they use digits.
:
