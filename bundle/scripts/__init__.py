"""Custom code of the cxr_segmentation bundle: readers, transforms, data lists and networks.

The bundle's configs import this package as ``scripts`` (the MONAI Model Zoo convention);
they put ``bundle_root`` first on ``sys.path`` so that no other module named ``scripts`` wins.
"""
