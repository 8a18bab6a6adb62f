"""An in-process OMERO.server stand-in for tests (never imported by shipped code).

It speaks real Ice 3.6 to the UNMODIFIED omero-py client, through the servant base classes
omero-py generates (``omero.api.ServiceFactory``, ``omero.api.IQuery``, ``Glacier2.Router`` ...;
Ice 3.6 has no ``*Disp`` classes), and enforces OMERO's pixel-writing rules
(shared/omero-facts.md) so that a writer which passes here obeys a real server too.

Transport: like a real OMERO 5.6 server, the stand-in serves Glacier2 on ssl (``port``, a
throw-away self-signed certificate; omero-py connects with IceSSL.VerifyPeer=0) and on tcp
(``tcp_port``), and its config answers ``omero.router.insecure`` with the tcp router. So the
plain ``BlitzGateway(user, pw, host="127.0.0.1", port=standin.port).connect()`` works unchanged:
it logs in over ssl and then, as BlitzGateway does by default (secure=False), joins the session
over tcp. No client option is needed, and the same code works against a real server (4064).

Layout
  server.py        OmeroStandin: start/stop/crash, users, data accessors, fault hooks
  glacier.py       Glacier2 router (createSession, joins, destroySession) and the gate that
                   refuses calls from connections without a session (ObjectNotExistException)
  sessions.py      users and OMERO sessions (idle timeout -> SessionTimeoutException, then
                   RemovedSessionException; every call and sf.keepAlive reset the idle clock)
  services/        ServiceFactory, IAdmin, IConfig, ISession, IQuery, IUpdate, IPixels,
                   IContainer (registered, no operations), Delete2 via submit + Handle
  pixels_store.py  RawPixelsStore;  rules.py / pixel_buffers.py: the write rules and pyramid pass
  model_store.py   omero.model objects by class and id;  hql.py: the HQL subset
  amd.py           AMD glue; any operation not implemented raises ApiUsageException
                   ("... is not supported by the OMERO stand-in") instead of hanging
  fixtures.py      pytest fixtures omero_standin, omero_standin_factory, omero_target

Supported calls
  Glacier2: createSession (user/password, or a session uuid as both to join),
    getCategoryForClient, refreshSession, destroySession, getSessionTimeout, getACMTimeout.
  ServiceFactory: get{Admin,Config,Query,Update,Pixels,Container,Session}Service,
    createRawPixelsStore, keepAlive, keepAllAlive, setSecurityContext, getSecurityContexts,
    closeOnDestroy, detachOnDestroy, setCallback, activeServices, getByName, destroy, submit.
  IAdmin: getEventContext, canUpdate, getExperimenter, getGroup, lookupExperimenter,
    getMemberOfGroupIds, getLeaderOfGroupIds, getSecurityRoles.
  IConfig: getVersion, getConfigValue(s), getClientConfigValues, getDatabaseUuid, get*Time.
  ISession: getSession, getReferenceCount, closeSession.
  IQuery: get, find, findAll, findByString, findAllByString, findByQuery, findAllByQuery,
    projection, refresh -- HQL shapes in hql.py, e.g.
      select p from Project p where p.name = :name
      select d from Dataset d join d.projectLinks l where l.parent.id = :pid and d.name = :name
      select i from Image i left outer join fetch i.annotationLinks al
          left outer join fetch al.child join fetch i.pixels p where i.id = :id
      select count(l) from DatasetImageLink l where l.parent.id = :id        (projection)
    Collections known to the stand-in: Project.datasetLinks/annotationLinks,
    Dataset.projectLinks/imageLinks/annotationLinks, Image.datasetLinks/annotationLinks/pixels,
    Pixels.channels (model_store.COLLECTIONS). Unsupported shapes raise ApiUsageException.
  IUpdate: saveObject, saveAndReturnObject, saveCollection, saveArray, saveAndReturnArray,
    saveAndReturnIds (any omero.model graph, all-or-nothing), deleteObject (one object that
    nothing references, as the real one), indexObject.
  Delete2 (conn.deleteObjects(..., wait=True)): Image (with Pixels, Channels, links and
    orphaned annotations; Tag/Term/File annotations kept unless deleteAnns), Dataset, Project,
    annotations. Other commands answer ERR.
  IPixels: createImage, setChannelGlobalMinMax, retrievePixDescription, getBitDepth,
    getEnumeration, getAllEnumerations.
  RawPixelsStore: setPixelsId, requiresPixelsPyramid, getTileSize, getByteWidth, isSigned,
    isFloat, get{Plane,Row,Stack,Timepoint,Total}Size, get*Offset, set{Tile,Row,Plane,Region,
    Stack,Timepoint}, get{Tile,Plane,Row,Col,Region,Stack,Timepoint}, calculateMessageDigest,
    save, close; resolution level 0 only.

Errors a writer sees
  wrong password             Glacier2.PermissionDeniedException
  idle session               omero.SessionTimeoutException, then omero.RemovedSessionException
  read-only user / forbidden creation           omero.SecurityViolation
  setPlane/setRow/... on a pyramid; ROMIO setTile that is not a full-width stripe
                             omero.InternalException "Non-tile based writing unsupported." /
                             "...full-width..." (serverExceptionClass UnsupportedOperationException)
  pyramid tile out of order or of the wrong geometry (the pass is lost); any write after a
  read, save() or close(); writing a COMPLETE or BROKEN pyramid   omero.ApiUsageException
  reading an unfinished pyramid                 omero.MissingPyramidException
  a request over 64 MiB       refused by Ice itself (Ice.LocalException: the connection drops)
  server stopped / crashed    Ice.SocketException (ConnectionRefused / ConnectionLost)
"""
