"""Projects, datasets, images, links and annotations through IQuery/IUpdate/IPixels."""

import pytest

pytest.importorskip("omero")

import numpy as np
import omero
from omero.rtypes import rstring

from .helpers import create_image, new_project


def _dataset_in_project(conn, project_id, name):
    dataset = omero.model.DatasetI()
    dataset.setName(rstring(name))
    dataset.linkProject(omero.model.ProjectI(project_id, False))
    return conn.c.sf.getUpdateService().saveAndReturnObject(dataset)


def test_project_dataset_image_links_and_annotations_round_trip(omero_standin):
    conn = omero_standin.connect()
    sf = conn.c.sf
    query, update = sf.getQueryService(), sf.getUpdateService()

    project = new_project(conn, "run-1")
    dataset = _dataset_in_project(conn, project.id.val, "slide-7")
    image_id, pixels_id = create_image(conn, (1, 2, 1, 64, 32), np.uint16, "scan")
    link = omero.model.DatasetImageLinkI()
    link.setParent(omero.model.DatasetI(dataset.id.val, False))
    link.setChild(omero.model.ImageI(image_id, False))
    update.saveObject(link)

    ann = omero.model.MapAnnotationI()
    ann.setNs(rstring("tilebridge/acquisition"))
    ann.setMapValue(
        [omero.model.NamedValue("objective", "20x"), omero.model.NamedValue("stage", "A")]
    )
    img_link = omero.model.ImageAnnotationLinkI()
    img_link.setParent(omero.model.ImageI(image_id, False))
    img_link.setChild(ann)
    saved = update.saveAndReturnObject(img_link)
    assert saved.child.id is not None and saved.child.getMapValue()[0].name == "objective"

    pixels = query.get("Pixels", pixels_id)
    pixels.setPhysicalSizeX(omero.model.LengthI(0.5, omero.model.enums.UnitsLength.MICROMETER))
    update.saveObject(pixels)
    channel = query.findByQuery(
        "select c from Channel c join fetch c.logicalChannel "
        "where c.pixels.id = :pid order by c.id",
        omero.sys.ParametersI().add("pid", omero.rtypes.rlong(pixels_id)).page(0, 1),
    )
    channel.getLogicalChannel().setName(rstring("DAPI"))
    update.saveObject(channel.getLogicalChannel())

    params = omero.sys.ParametersI().add("name", rstring("run-1"))
    found = query.findAllByQuery("select p from Project p where p.name = :name", params)
    assert [p.id.val for p in found] == [project.id.val]
    params = (
        omero.sys.ParametersI()
        .add("pid", omero.rtypes.rlong(project.id.val))
        .add("name", rstring("slide-7"))
    )
    ds = query.findByQuery(
        "select d from Dataset d join d.projectLinks l where l.parent.id = :pid and d.name = :name",
        params,
    )
    assert ds.id.val == dataset.id.val
    img = query.findByQuery(
        "select i from Image i left outer join fetch i.annotationLinks al "
        "left outer join fetch al.child join fetch i.pixels p join fetch p.channels c "
        "join fetch c.logicalChannel where i.id = :id",
        omero.sys.ParametersI().addId(image_id),
    )
    assert img.getName().val == "scan"
    [annotation] = [al.child for al in img.copyAnnotationLinks()]
    assert [(nv.name, nv.value) for nv in annotation.getMapValue()] == [
        ("objective", "20x"),
        ("stage", "A"),
    ]
    px = img.getPrimaryPixels()
    assert px.getPhysicalSizeX().getValue() == 0.5
    assert px.getPhysicalSizeX().getUnit() == omero.model.enums.UnitsLength.MICROMETER
    assert px.copyChannels()[0].getLogicalChannel().getName().val == "DAPI"
    with pytest.raises(omero.UnloadedEntityException):
        query.get("Image", image_id).copyDatasetLinks()
    count = query.projection(
        "select count(l) from DatasetImageLink l where l.parent.id = :id",
        omero.sys.ParametersI().addId(dataset.id.val),
    )
    assert count[0][0].val == 1

    server = omero_standin.server
    assert ("DatasetImageLink", "Dataset", dataset.id.val, "Image", image_id) in server.links()
    assert (
        "ProjectDatasetLink",
        "Project",
        project.id.val,
        "Dataset",
        dataset.id.val,
    ) in server.links()
    assert server.key_values(image_id, "tilebridge/acquisition") == [
        ("objective", "20x"),
        ("stage", "A"),
    ]


def test_unsupported_query_shapes_are_refused_loudly(omero_standin):
    query = omero_standin.connect().c.sf.getQueryService()
    with pytest.raises(omero.ApiUsageException, match="unsupported query"):
        query.findAllByQuery("select p from Project p where p.name = 'a' or p.name = 'b'", None)
    with pytest.raises(omero.ApiUsageException, match="not supported by the OMERO stand-in"):
        query.findAllByFullText("Image", "scan", None)


# omero.callbacks (waiting on the Delete2 handle) still calls threading.Event.isSet().
@pytest.mark.filterwarnings("ignore:isSet\\(\\) is deprecated:DeprecationWarning")
def test_delete2_removes_the_image_with_pixels_links_and_annotations(omero_standin):
    conn = omero_standin.connect()
    project = new_project(conn, "p")
    dataset = _dataset_in_project(conn, project.id.val, "d")
    image_id, _ = create_image(conn, (1, 1, 1, 8, 8), np.uint8)
    link = omero.model.DatasetImageLinkI()
    link.setParent(omero.model.DatasetI(dataset.id.val, False))
    link.setChild(omero.model.ImageI(image_id, False))
    conn.c.sf.getUpdateService().saveObject(link)
    with pytest.raises(omero.ValidationException, match="still referenced"):
        conn.c.sf.getUpdateService().deleteObject(omero.model.ImageI(image_id, False))

    conn.deleteObjects("Image", [image_id], wait=True)

    server = omero_standin.server
    assert server.images() == []
    assert server.objects("Pixels") == []
    assert [link.kind for link in server.links()] == ["ProjectDatasetLink"]
    with pytest.raises(KeyError):
        server.pixels(image_id)


def test_security_violations_can_be_switched_on(omero_standin):
    server = omero_standin.server
    conn = omero_standin.connect()
    server.faults.forbid_create.update({"Project", "Dataset"})
    with pytest.raises(omero.SecurityViolation):
        new_project(conn, "forbidden")
    server.faults.forbid_create.clear()
    new_project(conn, "allowed")

    server.set_read_only(omero_standin.username)
    with pytest.raises(omero.SecurityViolation):
        new_project(conn, "read-only")
    with pytest.raises(omero.SecurityViolation):
        create_image(conn, (1, 1, 1, 4, 4), np.uint8)
    assert [p.name.val for p in server.projects()] == ["allowed"]
