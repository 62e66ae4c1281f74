# setuptools needs setup.py for cffi_modules: the KVM binding is compiled here, at install time,
# against the machine's <linux/kvm.h> (cffi API mode), so struct layouts come from the header.
from setuptools import setup

# The migration data path (migrate/datapath) is a second cffi module, linked with libzstd.
setup(cffi_modules=["hv/binding/build.py:ffibuilder", "migrate/datapath/_build.py:ffibuilder"])
