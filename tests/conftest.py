"Fixtures and settings shared by the tests: the bundled organism (loaded once per session) and the `slow` marker."
import pytest

from seqcircuits.model import load_model, organism_dir

ORGANISM_MAX_BYTES = 8 * 2**20  # the bundled organism's files stay under 8 MiB: it ships inside the package


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: takes minutes of CPU (whole studies through the command line); '
                                       'deselect with -m "not slow"')


@pytest.fixture(scope='session')
def organism_model():
    "The bundled model organism, loaded once for every test that needs it (skipped where it is not bundled)."
    if not (organism_dir()/'model.safetensors').exists(): pytest.skip('the model organism is not bundled')
    return load_model()
