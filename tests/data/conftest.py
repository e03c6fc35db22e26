import pytest


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """24 natural photographs at ImageNet's size distribution (tools/make_photos.py), made once per
    session: the ImageFolder split (one class folder per tenth of the files)."""
    from tools.make_photos import write

    return write(tmp_path_factory.mktemp("photos"), n=24, seed=0)
