from tests.omero_standin.fixtures import (  # noqa: F401 - fixtures are used by name
    import_omero_quietly,
    omero_standin,
    omero_standin_factory,
    omero_target,
)

import_omero_quietly()
