"""magic-init's library: Caffe model files, two engines (pycaffe and a numpy engine), and the
data-dependent initialization of Krähenbühl et al. (ICLR 2016).

Import submodules directly (``caffe_utils.netio``, ``caffe_utils.engine`` ...); importing this
package does not import pycaffe.
"""
__version__ = "0.1.0"
