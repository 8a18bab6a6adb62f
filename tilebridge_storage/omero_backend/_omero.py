"""omero-py and Ice, imported in one place with their import-time warnings silenced.

zeroc-ice 3.6 imports the `imp` module, which warns on Python 3.11; under `-W error` (the
test suite) that warning would be an import failure.
"""

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", PendingDeprecationWarning)
    import Glacier2
    import Ice
    import omero
    import omero.callbacks
    import omero.clients
    import omero.cmd
    import omero.model
    import omero.rtypes
    import omero.sys
    from omero.model.enums import UnitsLength, UnitsTime

__all__ = ["Glacier2", "Ice", "UnitsLength", "UnitsTime", "omero"]
