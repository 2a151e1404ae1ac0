import os, time, pytest
@pytest.fixture
def ui():
    return 1
@pytest.mark.parametrize("i", range(6))
def test_g(ui, i):
    time.sleep(0.3)
@pytest.mark.parametrize("i", range(6))
def test_free(i):
    time.sleep(0.3)
