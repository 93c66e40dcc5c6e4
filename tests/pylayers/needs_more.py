"""A Python layer that needs more than the Layer API (caffe.Net): not for the numpy engine's shim."""
import caffe

BASE_NET = caffe.Net


class Uses(caffe.Layer):
    pass
