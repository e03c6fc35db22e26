"""The one compiled part: data/_jpeg.c, libjpeg-turbo's partial decode for the training transform
(docs/data.md). Optional: without libjpeg's headers (Debian/Ubuntu: libjpeg-dev; Fedora/RHEL:
libjpeg-turbo-devel) the install still succeeds and training decodes whole images, as before."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("data._jpeg", ["data/_jpeg.c"], libraries=["jpeg"], optional=True)])
