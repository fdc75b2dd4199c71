"""The processes below the service and the typed wire between them: the engine host and a
frontend's scheduler stand-in (the frontend link), several engine cores behind one scheduler
face, and the engine worker process that runs the engine."""
